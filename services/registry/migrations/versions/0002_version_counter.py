"""registered_models.latest_version -> last_issued_version

The column was always the counter that hands out version numbers (monotonic, never reused).
The API's `latest_version` is now the highest committed (READY) version and is computed from
model_versions, so the counter gets a name that says what it is.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 22:10:00
"""

from alembic import op


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ALTER TABLE ... RENAME COLUMN on both SQLite (>= 3.25) and PostgreSQL: no table
    # copy, so the foreign keys of the tables that reference registered_models stay untouched.
    op.alter_column('registered_models', 'latest_version', new_column_name='last_issued_version')


def downgrade() -> None:
    op.alter_column('registered_models', 'last_issued_version', new_column_name='latest_version')
