"""SANDFLEET_BROKER_URL as a list of one cluster's nodes: what is refused, and how a
list is shown and read."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from sandfleet.common.amqp import broker_login, redacted_url
from sandfleet.common.broker_urls import check_broker_urls, split_broker_urls
from sandfleet.common.settings import Settings

NODES = "amqp://u:secret@n1:5672/fleet, amqp://u:secret@n2:5672/fleet,amqp://u:secret@n3/fleet"


def test_a_list_is_split_and_trimmed_in_order() -> None:
    assert [url.split("@")[1] for url in split_broker_urls(NODES)] == [
        "n1:5672/fleet",
        "n2:5672/fleet",
        "n3/fleet",
    ]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("amqp://u:p@a/v,amqps://u:p@b/v", "URL 2 of 2 has scheme 'amqps' but URL 1 has 'amqp'"),
        ("amqp://u:p@a/v,amqp://w:p@b/v", "URL 2 of 2 has login 'w' but URL 1 has 'u'"),
        ("amqp://u:p@a/v,amqp://u:p@b/x", "URL 2 of 2 has virtual host 'x' but URL 1 has 'v'"),
        ("amqp://u:p@a/v,", "URL 2 of 2 is empty (a stray comma?)"),
        ("amqp://u:p@a/v,http://b/v", "URL 2 of 2 is not amqp:// or amqps:// (a comma"),
        ("amqp://u:p@a/v,amqp:///v", "URL 2 of 2 names no host"),
        ("amqp://u:p@a:99999/v,amqp://u:p@b/v", "URL 1 of 2 does not parse"),
    ],
)
def test_a_list_that_is_not_one_cluster_is_refused_saying_which_url(
    value: str, reason: str
) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(reason)):
        check_broker_urls(value)
    with pytest.raises(ValidationError, match="broker_url"):
        Settings(broker_url=value)


def test_a_single_url_is_left_as_it_was() -> None:
    assert check_broker_urls("amqp://guest:guest@127.0.0.1:5672/") == (
        "amqp://guest:guest@127.0.0.1:5672/"
    )


def test_every_password_of_a_list_is_hidden_and_the_login_is_read() -> None:
    shown = redacted_url(NODES)
    assert "secret" not in shown
    assert shown.count("u:***@") == 3
    assert broker_login(NODES) == "u"


def test_a_password_cut_by_a_raw_comma_is_refused_without_showing_it() -> None:
    with pytest.raises(ValidationError) as raised:
        Settings(broker_url="amqp://u:top,secret@n1/v,amqp://u:top,secret@n2/v")
    assert "%2C" in str(raised.value)
    assert "secret" not in str(raised.value)
