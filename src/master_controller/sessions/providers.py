"""What the controller needs of a provider to sign a person in: the options its login takes
(``oauth2``: its endpoints and client, from the settings) and what the guest may reach while
it runs (the provider says: :meth:`mc_agent.providers.Provider.sign_in_reach`)."""

from __future__ import annotations

from master_controller.errors import ConfigError
from master_controller.network.egress import Allowance
from master_controller.settings import Settings
from mc_agent import providers


def login_options(settings: Settings, provider: str) -> dict[str, str]:
    """The options of ``provider``'s login; refuses a provider this controller cannot sign
    in to (an unknown name, or ``oauth2`` without its settings)."""
    try:
        chosen = providers.get(provider)
    except providers.ProviderError as exc:
        raise ConfigError(str(exc)) from exc
    if provider != "oauth2":
        return {}
    s = settings
    if not (s.oauth2_authorize_url and s.oauth2_token_url and s.oauth2_client_id):
        raise ConfigError(
            "the oauth2 provider is not configured (oauth2_authorize_url, "
            "oauth2_token_url, oauth2_client_id)"
        )
    options = {
        "authorize_url": s.oauth2_authorize_url,
        "token_url": s.oauth2_token_url,
        "client_id": s.oauth2_client_id,
        "scope": s.oauth2_scope,
    }
    try:
        return chosen.check_options(options)
    except providers.ProviderError as exc:
        raise ConfigError(f"oauth2 settings: {exc}") from exc


def allowance(settings: Settings, session_id: str, provider: str) -> Allowance:
    """What a session's guest may reach while it signs in to ``provider``."""
    domains, ports = providers.get(provider).sign_in_reach(login_options(settings, provider))
    return Allowance(session_id=session_id, domains=domains, ports=ports)
