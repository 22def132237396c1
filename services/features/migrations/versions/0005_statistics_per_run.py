"""statistics per materialization run

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 10:30:00

Each finished run keeps the statistics of the rows it materialized (NULL for a run that found
none), so an empty incremental run no longer replaces the reference profile. The one profile per
view version kept so far moves onto the run that computed it (same timestamp), and its table goes.
"""

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('materializations', sa.Column('stats', sa.LargeBinary(), nullable=True))
    op.execute(
        "UPDATE materializations SET stats = (SELECT s.stats FROM feature_statistics s "
        "WHERE s.view = materializations.view AND s.version = materializations.version "
        "AND s.compute_time = materializations.finish_time) WHERE rows > 0")
    op.drop_table('feature_statistics')


def downgrade() -> None:
    op.create_table('feature_statistics',
    sa.Column('view', sa.String(length=64), nullable=False),
    sa.Column('version', sa.BigInteger(), nullable=False),
    sa.Column('stats', sa.LargeBinary(), nullable=False),
    sa.Column('compute_time', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('view', 'version')
    )
    op.execute(
        "INSERT INTO feature_statistics (view, version, stats, compute_time) "
        "SELECT m.view, m.version, m.stats, m.finish_time FROM materializations m "
        "WHERE m.stats IS NOT NULL AND m.finish_time = (SELECT max(n.finish_time) FROM materializations n "
        "WHERE n.view = m.view AND n.version = m.version AND n.stats IS NOT NULL)")
    with op.batch_alter_table('materializations') as batch:
        batch.drop_column('stats')
