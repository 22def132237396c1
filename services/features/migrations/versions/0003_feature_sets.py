"""feature sets

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 18:40:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('feature_sets',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('spec', sa.LargeBinary(), nullable=False),
    sa.Column('create_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('update_time', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )


def downgrade() -> None:
    op.drop_table('feature_sets')
