"""The agent's login (``mc_agent.login``) against a hostile browser user, in-process: what
it reads, writes and reports, with a home and login folder in a temporary folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mc_agent import providers
from mc_agent.events import EventLog
from mc_agent.login import MAX_URL_LENGTH, MAX_URLS, URLS_LIMIT, Account, Login
from mc_agent.providers import ProviderError, get
from mc_agent.wipe import remove_user_files

UID = 4242 if os.geteuid() == 0 else os.getuid()
GID = 4242 if os.geteuid() == 0 else os.getgid()
VALID_TOKEN = {"access_token": "a", "token_type": "Bearer", "expires_at": 4102444800}


@pytest.fixture
def account(tmp_path: Path) -> Account:
    for name in ("home", "login"):
        (tmp_path / name).mkdir()
        os.chown(tmp_path / name, UID, GID)
    return Account("browser", UID, GID, tmp_path / "home", tmp_path / "login")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "shadow").write_text("root:$6$secret\n")
    return folder


def _login(account: Account, provider: str = "oauth2") -> Login:
    options = (
        {
            "authorize_url": "https://idp.example/authorize",
            "token_url": "https://idp.example/token",
            "client_id": "c",
        }
        if provider == "oauth2"
        else {}
    )
    return Login(get(provider), options, EventLog(), account)


def _plant(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chown(path, UID, GID)


def test_gemini_settings_through_a_symlinked_folder_are_refused(
    account: Account, outside: Path
) -> None:
    """The finding: ``~/.gemini -> /etc`` made the agent chown /etc to the browser user
    and write settings.json into it."""
    (account.home / ".gemini").symlink_to(outside)
    before = outside.stat()
    login = _login(account, "gemini_cli")
    with pytest.raises(ProviderError, match=r"~/.gemini/settings.json: .*symbolic link"):
        for relative, content in login.provider.home_files(login.options).items():
            login.write_home_file(relative, content)
    assert (outside.stat().st_uid, outside.stat().st_mode) == (before.st_uid, before.st_mode)
    assert [p.name for p in outside.iterdir()] == ["shadow"]


def test_a_credential_file_linked_to_a_root_file_is_not_handed_out(
    account: Account, outside: Path
) -> None:
    target = outside / "token.json"
    target.write_text(json.dumps(VALID_TOKEN))  # valid content, root's file
    path = account.home / ".config/mc-oauth2/token.json"
    path.parent.mkdir(parents=True)
    path.symlink_to(target)
    login = _login(account)
    assert login.read_files() == {}
    status = login.check_credentials()
    assert not status.valid and "symbolic link" in status.reason
    with pytest.raises(ProviderError, match="no valid credentials"):
        login.fetch()


def test_only_the_providers_own_files_are_returned(account: Account) -> None:
    _plant(account.home / ".config/mc-oauth2/token.json", json.dumps(VALID_TOKEN))
    _plant(account.home / ".config/mc-oauth2/other.json", '{"x": 1}')
    _plant(account.home / ".codex/auth.json", '{"OPENAI_API_KEY": "k"}')
    fetched = _login(account).fetch()
    assert fetched is not None and set(fetched["files"]) == {".config/mc-oauth2/token.json"}
    assert _login(account).fetch() is not None  # a new login: its own once-only flag


def test_credential_files_are_bounded_and_text(account: Account) -> None:
    path = account.home / ".config/mc-oauth2/token.json"
    _plant(path, "x" * (providers.MAX_CREDENTIAL_BYTES + 1))
    login = _login(account)
    assert login.read_files() == {}
    assert "larger than" in login.check_credentials().reason
    path.write_bytes(b'{"access_token": "\xff"}')
    assert login.read_files() == {} and "not UTF-8" in login.check_credentials().reason


def test_recorded_urls_are_read_safely_and_bounded(account: Account, outside: Path) -> None:
    login = _login(account)
    urls = account.login_dir / "urls.jsonl"
    (outside / "urls.jsonl").write_text(json.dumps({"url": "https://root.only/"}) + "\n")
    urls.symlink_to(outside / "urls.jsonl")
    assert login.recorded_urls() == []  # a link: not followed
    urls.unlink()
    lines = [json.dumps({"url": f"https://idp.example/{i}"}) for i in range(3)]
    _plant(urls, "\n".join(["not json", json.dumps({"url": 5}), *lines]) + "\n")
    assert login.recorded_urls() == [f"https://idp.example/{i}" for i in range(3)]
    _plant(urls, "x" * (URLS_LIMIT + 1))
    assert login.recorded_urls() == []  # too large: ignored


def test_reported_urls_are_bounded(account: Account) -> None:
    login = _login(account)
    for i in range(MAX_URLS * 3):
        login._url(f"https://idp.example/{i}", "terminal")
    login._url("https://idp.example/" + "a" * MAX_URL_LENGTH, "terminal")
    described = login.describe()
    assert len(described["terminal_urls"]) == MAX_URLS
    assert all(len(u) <= MAX_URL_LENGTH for u in described["terminal_urls"])
    assert len(json.dumps(described)) < 128 * 1024


def test_status_reasons_are_bounded() -> None:
    status = providers.CredentialStatus(False, "x" * 10_000)
    assert len(status.as_dict()["reason"]) == providers.MAX_REASON


@pytest.mark.parametrize("name", ["../.ssh/id_rsa", "/etc/shadow", "a/./b", "a//b"])
def test_a_provider_cannot_name_files_outside_the_home(name: str) -> None:
    with pytest.raises(ValueError, match="not plain"):
        providers.Provider("x", "X", "", credential_files=(name,))


def test_the_login_folder_is_emptied_and_the_users(account: Account, outside: Path) -> None:
    (account.login_dir / "tmux.conf").symlink_to(outside / "shadow")  # the old attack
    _plant(account.login_dir / "urls.jsonl", "{}")
    account.prepare_login_dir()
    assert list(account.login_dir.iterdir()) == []
    assert (outside / "shadow").read_text() == "root:$6$secret\n"
    info = account.login_dir.stat()
    assert (info.st_uid, info.st_mode & 0o777) == (UID, 0o700)


def test_wiping_files_empties_the_home_without_following_links(
    account: Account, outside: Path, tmp_path: Path
) -> None:
    _plant(account.home / ".config/mc-oauth2/token.json", json.dumps(VALID_TOKEN))
    _plant(account.home / ".config/chromium/Default/Cookies", "session")
    (account.home / ".cache").symlink_to(outside)  # a link to a root folder: only it goes
    (account.home / ".config/chromium/Default/link").symlink_to(outside / "shadow")
    os.mkfifo(account.home / "fifo")
    _plant(account.login_dir / "urls.jsonl", "{}")
    removed = remove_user_files(account, leftovers=())
    assert removed == sorted(["~/.cache", "~/.config", "~/fifo", f"{account.login_dir}/urls.jsonl"])
    assert list(account.home.iterdir()) == [] and list(account.login_dir.iterdir()) == []
    assert (outside / "shadow").read_text() == "root:$6$secret\n"
    assert remove_user_files(account, leftovers=()) == []  # again: nothing left to do
