"""Stand-ins for the host's ORM classes (``AgentORM``, ``AgentAPIKeyORM``),
mapped onto the host's real tables (tests/fixtures/host_schema.sql), and the
host's session class with the hook installed, as docs/host-integration.md
tells the host to do."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime

from sqlalchemy import DateTime, Enum, ForeignKey, String, Text, func
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import authz_outbox_host


class AgentStatus(enum.Enum):
    READY = "READY"
    DELETED = "DELETED"


class AgentAPIKeyType(enum.Enum):
    INTERNAL = "INTERNAL"
    EXTERNAL = "EXTERNAL"


class Base(DeclarativeBase):
    pass


def new_id() -> str:
    return str(uuid.uuid4())


class AgentORM(Base):
    __tablename__ = "agents"
    id: Mapped[str] = mapped_column(String, primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String, unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[AgentStatus] = mapped_column(
        Enum(AgentStatus, name="agentstatus", create_type=False), default=AgentStatus.READY
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class AgentAPIKeyORM(Base):
    __tablename__ = "agent_api_keys"
    id: Mapped[str] = mapped_column(String, primary_key=True, default=new_id)
    agent_id: Mapped[str] = mapped_column(String(64), ForeignKey("agents.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    api_key_type: Mapped[AgentAPIKeyType] = mapped_column(
        Enum(AgentAPIKeyType, name="agentapikeytype", create_type=False)
    )
    api_key: Mapped[str] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class HostSession(Session):
    """The host's session class; sync and async sessions are built on it."""


authz_outbox_host.install(HostSession)
