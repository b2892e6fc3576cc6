"""Cards issued, clinician feedback, JWT replay cache.

Revision ID: 0001
Revises:
Create Date: 2025-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "rpl_card",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("card_uuid", sa.String(64), nullable=False),
        sa.Column("service_id", sa.String(64), nullable=False),
        sa.Column("hook", sa.String(32), nullable=False),
        sa.Column("rule_id", sa.String(64), nullable=False),
        sa.Column("indicator", sa.String(16), nullable=False),
        sa.Column("hook_instance", sa.String(128), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("patient_pseudonym", sa.String(64), nullable=False),
        sa.Column("order_ref_pseudonym", sa.String(64), nullable=True),
        sa.Column("order_code", sa.String(300), nullable=True),
        sa.Column("category", sa.String(64), nullable=True),
        sa.Column("suggestions", sa.JSON(), nullable=False),
        sa.UniqueConstraint("card_uuid", name="uq_rpl_card_card_uuid"),
    )
    op.create_index("ix_rpl_card_issued_at", "rpl_card", ["issued_at"])
    op.create_index("ix_rpl_card_patient_category", "rpl_card", ["patient_pseudonym", "category"])

    op.create_table(
        "rpl_feedback",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("dedup_key", sa.String(64), nullable=False),
        sa.Column(
            "card_uuid",
            sa.String(64),
            sa.ForeignKey("rpl_card.card_uuid", name="fk_rpl_feedback_card", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("outcome_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("accepted_suggestions", sa.JSON(), nullable=False),
        sa.Column("override_reason_system", sa.String(300), nullable=True),
        sa.Column("override_reason_code", sa.String(200), nullable=True),
        sa.Column("override_has_comment", sa.Boolean(), nullable=False),
        sa.UniqueConstraint("dedup_key", name="uq_rpl_feedback_dedup_key"),
    )
    op.create_index("ix_rpl_feedback_card_uuid", "rpl_feedback", ["card_uuid"])

    # JWT replay cache (jti), owned by service/replay.py.
    op.create_table(
        "jwt_replay",
        sa.Column("key_hash", sa.String(64), primary_key=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_jwt_replay_expires_at", "jwt_replay", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_jwt_replay_expires_at", table_name="jwt_replay")
    op.drop_table("jwt_replay")
    op.drop_index("ix_rpl_feedback_card_uuid", table_name="rpl_feedback")
    op.drop_table("rpl_feedback")
    op.drop_index("ix_rpl_card_patient_category", table_name="rpl_card")
    op.drop_index("ix_rpl_card_issued_at", table_name="rpl_card")
    op.drop_table("rpl_card")
