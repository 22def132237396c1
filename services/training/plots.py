"""The job's diagnostic plots, as PNG run artifacts: a confusion matrix on the held-out rows for a
classifier, predictions against residuals for a regressor (matplotlib, off-screen)."""

from __future__ import annotations

import io

import numpy as np

from services.training.types import Task


def held_out_plot(task: Task, y: np.ndarray, output: np.ndarray, classes: np.ndarray | None) -> tuple[str, bytes]:
    """(artifact name, PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    try:
        if task == Task.CLASSIFICATION:
            from sklearn.metrics import ConfusionMatrixDisplay

            labels = classes[np.argmax(output, axis=1)]
            ConfusionMatrixDisplay.from_predictions(y, labels, labels=classes, ax=ax, colorbar=False)
            ax.set_title("held-out confusion matrix")
            name = "confusion_matrix.png"
        else:
            pred = np.asarray(output, dtype=float).ravel()
            ax.scatter(pred, np.asarray(y, dtype=float) - pred, s=6, alpha=0.6)
            ax.axhline(0.0, color="grey", linewidth=1)
            ax.set_xlabel("prediction")
            ax.set_ylabel("residual (label - prediction)")
            ax.set_title("held-out residuals")
            name = "residuals.png"
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return name, buf.getvalue()
    finally:
        plt.close(fig)
