import json

import pytest

from mc_agent.config import ConfigError, GuestConfig


def test_round_trip() -> None:
    config = GuestConfig(guest_id="g1", vnc_password="abcdefgh", agent_token="t" * 20)
    assert GuestConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("not json", "not JSON"),
        ("[]", "JSON object"),
        (json.dumps({"guest_id": "g"}), "lacks vnc_password, agent_token"),
        (json.dumps({"guest_id": "g", "vnc_password": "123456789", "agent_token": "t"}), "6 to 8"),
        (
            json.dumps(
                {
                    "guest_id": "g",
                    "vnc_password": "12345678",
                    "agent_token": "t",
                    "hostname": "bad host;rm",
                }
            ),
            "invalid hostname",
        ),
    ],
)
def test_bad_config_is_refused(data: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GuestConfig.from_json(data)
