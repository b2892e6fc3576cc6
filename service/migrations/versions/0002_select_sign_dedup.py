"""Select/sign de-duplication: encounter pseudonym and order content hash on issued cards.

Existing cards keep NULL in both columns: they never match a later order-sign call, so the worst
an upgrade can do is show one warning once more.

Revision ID: 0002
Revises: 0001
Create Date: 2025-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("rpl_card", sa.Column("encounter_pseudonym", sa.String(64), nullable=True))
    op.add_column("rpl_card", sa.Column("order_hash", sa.String(64), nullable=True))
    op.create_index(
        "ix_rpl_card_select_sign",
        "rpl_card",
        ["patient_pseudonym", "encounter_pseudonym", "order_code"],
    )


def downgrade() -> None:
    with op.batch_alter_table("rpl_card") as batch:
        batch.drop_index("ix_rpl_card_select_sign")
        batch.drop_column("order_hash")
        batch.drop_column("encounter_pseudonym")
