"""idempotency keys

Revision ID: 0004
Revises: 0003
Create Date: 2027-01-10 10:00:00

Request ids of CreateEndpoint and CreateBatchJob move to the platform's idempotency_keys table
(services/common/idempotency.py): scoped to the principal and the method, with the payload's
digest. The ids already in endpoints.create_request_id and batch_jobs.create_request_id are
copied with no digest (a retry with such an id is refused as a different request rather than
creating a second resource); the old columns stay, no longer written.
"""

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('idempotency_keys',
    sa.Column('principal', sa.String(length=256), nullable=False),
    sa.Column('method', sa.String(length=128), nullable=False),
    sa.Column('request_id', sa.String(length=128), nullable=False),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('resource', sa.String(length=512), nullable=False),
    sa.Column('create_time', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('principal', 'method', 'request_id')
    )
    op.execute("INSERT INTO idempotency_keys (principal, method, request_id, request_hash, resource, create_time) "
               "SELECT created_by, 'CreateEndpoint', create_request_id, '', name, create_time FROM endpoints "
               "WHERE create_request_id IS NOT NULL")
    op.execute("INSERT INTO idempotency_keys (principal, method, request_id, request_hash, resource, create_time) "
               "SELECT created_by, 'CreateBatchJob', create_request_id, '', job_id, create_time FROM batch_jobs "
               "WHERE create_request_id IS NOT NULL")


def downgrade() -> None:
    op.drop_table('idempotency_keys')
