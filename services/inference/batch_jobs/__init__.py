"""Batch scoring jobs: a Parquet or CSV file scored by a model version into a Parquet file.

The job row in the service database is what every serving process shares: state, progress and
cancellation. The process that accepted a job runs it (BatchRunner), chunk_rows rows at a time:
read (pyarrow, streaming) -> numpy feeds (column by column, vectorised) -> the model (in a
worker thread) -> appended to a Parquet file at a temporary location. Only when every row is
scored is the file published to output_uri, in one atomic step, so a failed or cancelled job
leaves nothing there.

Output layout: the input's columns unchanged, then one column per model output, named like the
output. An output with one value per row ([N] or [N, 1]) is a plain column; a wider one is a
fixed_size_list column holding the row's values (row-major, flattened when the rank is > 2).

Cancelling is a state change in the database; the runner's progress update after every chunk is
guarded by state == RUNNING, so a cancel through any process stops the job at the next chunk.
Once every row is scored (rows_done == rows_total) a job can no longer be cancelled: it is
publishing, and CANCELLED must mean "no output".

The modules, none of which imports protobuf (the RPCs and their converters are in
services/inference/batch_servicer.py):

- store.py: the batch_jobs table (BatchJobStore), the job record and its states, job ids, and
  the checks of a job that need neither the registry nor the files (validate_job).
- feeds.py: reading the input (Parquet, CSV) in chunks, mapping its columns to the model's
  inputs (plan_feeds, build_feeds), scoring a chunk, and the output columns.
- output.py: the output file, written at a temporary place and published when complete.
- runner.py: BatchRunner, which runs this process's jobs.
"""

from services.inference.batch_jobs.feeds import JobError
from services.inference.batch_jobs.runner import BatchRunner
from services.inference.batch_jobs.store import BatchJobRecord, BatchJobState, BatchJobStore, validate_job

__all__ = ["BatchJobRecord", "BatchJobState", "BatchJobStore", "BatchRunner", "JobError", "validate_job"]
