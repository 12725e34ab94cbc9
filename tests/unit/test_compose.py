"""compose.yaml runs real `redrive` commands: every service container names a service that exists."""

from pathlib import Path

from redrive.supervisor import SERVICES

COMPOSE = Path(__file__).resolve().parents[2] / "compose.yaml"


def _commands() -> dict[str, list[str]]:
    import re

    out, current = {}, None
    for line in COMPOSE.read_text().splitlines():
        m = re.match(r"^  (\w[\w-]*):\s*$", line)
        if m:
            current = m.group(1)
        c = re.match(r'^\s+command: \[(.*)\]', line)
        if c and current:
            out[current] = [p.strip().strip('"') for p in c.group(1).split(",")]
    return out


def test_every_service_command_in_compose_is_a_real_redrive_service():
    commands = _commands()
    services = {name: cmd for name, cmd in commands.items() if cmd[:2] == ["redrive", "service"]}
    assert sorted(cmd[2] for cmd in services.values()) == sorted(SERVICES)
    assert commands["migrate"] == ["redrive", "migrate"]
