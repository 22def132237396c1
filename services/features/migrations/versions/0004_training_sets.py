"""training sets: who wrote each one

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 22:30:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('training_sets',
    sa.Column('uri', sa.Text(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('created_by', sa.String(length=256), nullable=False),
    sa.Column('request_id', sa.String(length=128), nullable=True),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('dataset', sa.LargeBinary(), nullable=True),
    sa.Column('create_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('update_time', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('uri'),
    sa.UniqueConstraint('request_id')
    )


def downgrade() -> None:
    op.drop_table('training_sets')
