"""initial schema: prediction files, references, ground truth, audit events

Revision ID: 0001
Revises:
Create Date: 2026-11-30 04:53:43
"""

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('principal', sa.String(length=256), nullable=False),
    sa.Column('method', sa.String(length=256), nullable=False),
    sa.Column('resource', sa.String(length=512), nullable=False),
    sa.Column('request_id', sa.String(length=128), nullable=False),
    sa.Column('time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('outcome', sa.String(length=32), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.create_index('ix_audit_events_principal', ['principal'], unique=False)
        batch_op.create_index('ix_audit_events_resource', ['resource'], unique=False)

    op.create_table('monitoring_ground_truth',
    sa.Column('prediction_id', sa.String(length=256), nullable=False),
    sa.Column('number', sa.Double(), nullable=True),
    sa.Column('category', sa.Text(), nullable=True),
    sa.Column('time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('report_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('reported_by', sa.String(length=256), nullable=False),
    sa.PrimaryKeyConstraint('prediction_id')
    )
    op.create_table('monitoring_prediction_files',
    sa.Column('key', sa.String(length=1024), nullable=False),
    sa.Column('endpoint', sa.String(length=128), nullable=False),
    sa.Column('model', sa.String(length=128), nullable=False),
    sa.Column('version', sa.BigInteger(), nullable=False),
    sa.Column('day', sa.String(length=10), nullable=False),
    sa.Column('rows', sa.BigInteger(), nullable=False),
    sa.Column('min_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('max_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('arrow_schema', sa.LargeBinary(), nullable=False),
    sa.Column('create_time', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('key')
    )
    with op.batch_alter_table('monitoring_prediction_files', schema=None) as batch_op:
        batch_op.create_index('ix_monitoring_files_endpoint_day', ['endpoint', 'day'], unique=False)
        batch_op.create_index('ix_monitoring_files_version_day', ['model', 'version', 'day'], unique=False)

    op.create_table('monitoring_references',
    sa.Column('model', sa.String(length=128), nullable=False),
    sa.Column('version', sa.BigInteger(), nullable=False),
    sa.Column('table_uri', sa.Text(), nullable=False),
    sa.Column('from_lineage', sa.Boolean(), nullable=False),
    sa.Column('table_sha256', sa.String(length=64), nullable=False),
    sa.Column('rows', sa.BigInteger(), nullable=False),
    sa.Column('columns', sa.JSON(), nullable=False),
    sa.Column('profile_key', sa.String(length=1024), nullable=False),
    sa.Column('created_by', sa.String(length=256), nullable=False),
    sa.Column('create_time', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('model', 'version')
    )


def downgrade() -> None:
    op.drop_table('monitoring_references')
    with op.batch_alter_table('monitoring_prediction_files', schema=None) as batch_op:
        batch_op.drop_index('ix_monitoring_files_version_day')
        batch_op.drop_index('ix_monitoring_files_endpoint_day')

    op.drop_table('monitoring_prediction_files')
    op.drop_table('monitoring_ground_truth')
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index('ix_audit_events_resource')
        batch_op.drop_index('ix_audit_events_principal')

    op.drop_table('audit_events')
