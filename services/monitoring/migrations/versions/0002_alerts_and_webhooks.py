"""alert rules, alerts, webhooks and their deliveries

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 07:36:11.680708
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('monitoring_alert_rules',
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('endpoint', sa.String(length=128), nullable=False),
    sa.Column('model', sa.String(length=128), nullable=False),
    sa.Column('version', sa.BigInteger(), nullable=False),
    sa.Column('condition', sa.JSON(), nullable=False),
    sa.Column('window_seconds', sa.BigInteger(), nullable=False),
    sa.Column('interval_seconds', sa.BigInteger(), nullable=False),
    sa.Column('training_schedule_id', sa.String(length=128), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('created_by', sa.String(length=256), nullable=False),
    sa.Column('create_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('update_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('next_evaluation_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_evaluation_time', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_evaluation_note', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('monitoring_alerts',
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('alert_id', sa.String(length=36), nullable=False),
    sa.Column('rule', sa.String(length=128), nullable=False),
    sa.Column('target', sa.String(length=512), nullable=False),
    sa.Column('open_key', sa.String(length=700), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('value', sa.Double(), nullable=False),
    sa.Column('threshold', sa.Double(), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('open_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('acknowledged_by', sa.String(length=256), nullable=False),
    sa.Column('acknowledge_time', sa.DateTime(timezone=True), nullable=True),
    sa.Column('acknowledge_comment', sa.Text(), nullable=False),
    sa.Column('resolve_time', sa.DateTime(timezone=True), nullable=True),
    sa.Column('training_job_id', sa.String(length=128), nullable=False),
    sa.Column('trigger_error', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('alert_id'),
    sa.UniqueConstraint('open_key')
    )
    with op.batch_alter_table('monitoring_alerts', schema=None) as batch_op:
        batch_op.create_index('ix_monitoring_alerts_rule', ['rule', 'seq'], unique=False)

    op.create_table('monitoring_webhook_deliveries',
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('delivery_id', sa.String(length=36), nullable=False),
    sa.Column('webhook_id', sa.String(length=36), nullable=False),
    sa.Column('alert_id', sa.String(length=36), nullable=False),
    sa.Column('event', sa.String(length=16), nullable=False),
    sa.Column('payload', sa.Text(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('last_status', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=False),
    sa.Column('create_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('next_attempt_time', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('delivery_id')
    )
    with op.batch_alter_table('monitoring_webhook_deliveries', schema=None) as batch_op:
        batch_op.create_index('ix_monitoring_deliveries_due', ['state', 'next_attempt_time'], unique=False)
        batch_op.create_index('ix_monitoring_deliveries_webhook', ['webhook_id', 'seq'], unique=False)

    op.create_table('monitoring_webhooks',
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('webhook_id', sa.String(length=36), nullable=False),
    sa.Column('url', sa.String(length=2048), nullable=False),
    sa.Column('secret', sa.Text(), nullable=False),
    sa.Column('events', sa.JSON(), nullable=False),
    sa.Column('rules', sa.JSON(), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('created_by', sa.String(length=256), nullable=False),
    sa.Column('create_time', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('webhook_id')
    )


def downgrade() -> None:
    op.drop_table('monitoring_webhooks')
    with op.batch_alter_table('monitoring_webhook_deliveries', schema=None) as batch_op:
        batch_op.drop_index('ix_monitoring_deliveries_webhook')
        batch_op.drop_index('ix_monitoring_deliveries_due')

    op.drop_table('monitoring_webhook_deliveries')
    with op.batch_alter_table('monitoring_alerts', schema=None) as batch_op:
        batch_op.drop_index('ix_monitoring_alerts_rule')

    op.drop_table('monitoring_alerts')
    op.drop_table('monitoring_alert_rules')
