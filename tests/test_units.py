"""The pure parts, each on its own: no server, no socket, no outside program (a second or two).

Channel keys, the pace of fan-outs, the journal's replay, the tnetstring reader of Pushpin's stats,
publish pacing, badge widths, and the checks of every setting.
"""

import asyncio
import json
import math
import time

import pytest

import livecounter
from livecounter import DataFileError, Key, Pace, Paces, PublishPacing, Settings, load_counters, replay, tnetstring


# --- channel keys ----------------------------------------------------------------------------------

def test_a_key_names_its_channel_everywhere_a_change_goes():
    value, count = Key(("blog.post-1", False)), Key(("blog.post-1", True))
    assert value.count == count and count.count == count
    message, named = b"event: message\ndata: 27\n\n", b'event: counter\ndata: {"id": "blog.post-1", "value": 27}\n\n'
    assert value.frames(27) == (message, b"19\r\n" + message + b"\r\n", named, b"39\r\n" + named + b"\r\n")
    assert count.frames(3)[0] == b"event: message\ndata: 3\n\n"
    assert count.frames(3)[2] == b'event: watchers\ndata: {"id": "blog.post-1", "watchers": 3}\n\n'
    assert (value.purge_path, count.purge_path) == ("counters/blog.post-1/", "counters/blog.post-1/watchers/")
    assert [value.grip_channel(False), value.grip_channel(True), count.grip_channel(False), count.grip_channel(True)] == [
        "counter-blog.post-1", "counters:blog.post-1", "watchers-blog.post-1", "watchers:blog.post-1"]


@pytest.mark.parametrize("key", [Key(("2", False)), Key(("2", True)), Key(("counter-2", False)), Key(("watchers-x", True)), Key(("-", False)),
                                 Key(("counters", False)), Key(("a" * 64, True))])
@pytest.mark.parametrize("multi", [False, True])
def test_a_grip_channel_names_exactly_one_key(key, multi):
    assert Key.of_grip_channel(key.grip_channel(multi)) == (key, multi)


@pytest.mark.parametrize("channel", ["counter-", "counters:", "other-2", "counter-a b", "counter-..", "watchers-" + "a" * 65])
def test_a_channel_of_no_key_is_none(channel):
    assert Key.of_grip_channel(channel) is None


# --- the pace of fan-outs ----------------------------------------------------------------------------

def test_a_calm_channel_goes_at_once_and_a_hot_one_rests():
    pace = Pace()
    assert pace.wait(100.0) == 0  # never went: calm
    pace.went(0.05, 100.0)  # a fan-out that took 50 ms ended at 100 s
    assert pace.wait(100.06) == 0  # the next change came later than it took: calm, at once
    assert pace.wait(100.01) == pytest.approx(livecounter.REST * 0.05 - 0.01)  # sooner: hot, rests
    assert pace.wait(100.0) == pytest.approx(livecounter.REST * 0.05)


class SlowStream:
    """A stream the hub writes to, whose socket takes 2 ms a write (a big crowd, in small)."""
    unsent = b""
    style = 0

    def __init__(self, received: list) -> None:
        self.received = received

    def write(self, frame: bytes) -> None:
        time.sleep(0.002)
        self.received.append(frame)


async def test_hot_counters_share_the_loops_pace_and_end_current():
    """Every counter's streams share the event loop, so while three counters are hot their
    broadcasts together take about a sixth of the time (each resting after its own: half), every
    counter takes its turns, and each ends on its last value soon after the changes stop."""
    hub = livecounter.ListenerHub(keepalive_interval=15, stall_timeout=30, max_listeners=100, max_listeners_per_ip=100)
    keys = [Key((str(n), False)) for n in range(3)]
    received = {key: [] for key in keys}
    for key in keys:  # five streams each: 10 ms a broadcast
        channel = hub._channels[key] = livecounter.Channel(key, 0)
        channel.listeners.update(SlowStream(received[key]) for _ in range(5))
    values = dict.fromkeys(keys, 0)
    started = time.monotonic()
    while time.monotonic() - started < 1.0:
        for key in keys:
            values[key] += 1
            hub.changed(key, values[key])
        await asyncio.sleep(0.001)
    busy = 0.002 * sum(len(frames) for frames in received.values()) / (time.monotonic() - started)
    assert busy < 0.25, f"broadcasts took {busy:.0%} of the loop"
    assert all(len(frames) >= 2 * 5 for frames in received.values())  # turns: none starved
    await asyncio.sleep(0.2)  # the changes stopped: the waiting ones go in turn, without rests
    assert [frames[-1] for frames in received.values()] == [key.frames(values[key])[0] for key in keys]


def test_paces_forget_what_can_make_nobody_wait():
    paces = Paces(longest_cost=0.1)
    paces.went("a", 0.1, 0.0)
    assert paces.wait("a", 0.05) > 0 and paces.wait("b", 0.05) == 0
    paces.went("b", 0.1, 10.0)  # long after a's rest ended: a is forgotten
    assert len(paces) == 1 and paces.wait("a", 10.0) == 0


# --- the journal ---------------------------------------------------------------------------------------

def test_a_journal_replays_in_order_deletions_too_and_twice_is_harmless(tmp_path):
    data = tmp_path / "counters.json"
    data.write_text(json.dumps({"1": 5, "2": 0}))
    journal = tmp_path / "counters.json.journal"
    records = b'{"1": 6, "3": 1}\n{"2": null}\n{"2": 4, "1": 7}\n'
    journal.write_bytes(records)
    assert load_counters(data) == ({"1": 7, "2": 4, "3": 1}, len(data.read_bytes()), len(records))
    journal.write_bytes(records + records)  # replayed again over the same file: the same values
    assert load_counters(data).counters == {"1": 7, "2": 4, "3": 1}


@pytest.mark.parametrize("torn", [b'{"1": 9', b'{"1": 9}', b"\0\0\0\0", b'{"1": 9\n'])
def test_a_torn_last_record_is_dropped_and_cut_off(tmp_path, caplog, torn):
    data = tmp_path / "counters.json"
    data.write_text(json.dumps({"1": 5}))
    journal = tmp_path / "counters.json.journal"
    journal.write_bytes(b'{"1": 6}\n' + torn)
    assert load_counters(data).counters == {"1": 6}
    assert "dropped a torn last record" in caplog.text
    assert journal.read_bytes() == b'{"1": 6}\n'  # appends will follow a whole record


@pytest.mark.parametrize("records, problem", [
    (b'{"1": 6}\n{"1": 7\n{"1": 8}\n', "line 2 is no record"),
    (b'[1]\n{"1": 8}\n', "line 1 is no record"),
    (b'{"a b": 1}\n', "line 1: invalid counter id 'a b'"),
    (b'{"1": 1.5}\n', "line 1: counter '1' holds 1.5, not an integer"),
    (b'{"1": 9007199254740992}\n', "outside"),
])
def test_a_broken_record_before_the_last_stops_the_start(tmp_path, records, problem):
    data = tmp_path / "counters.json"
    data.write_text("{}")
    (tmp_path / "counters.json.journal").write_bytes(records)
    with pytest.raises(DataFileError, match=problem):
        load_counters(data)


def test_a_compaction_a_crash_left_is_replayed_before_the_journal(tmp_path):
    data = tmp_path / "counters.json"
    data.write_text(json.dumps({"1": 1}))  # the old data file: the crash came before its replacement
    (tmp_path / "counters.json.journal.compacting").write_bytes(b'{"1": 2, "2": 1}\n')
    (tmp_path / "counters.json.journal").write_bytes(b'{"1": 3}\n')
    assert load_counters(data).counters == {"1": 3, "2": 1}
    data.write_text(json.dumps({"1": 3, "2": 1}))  # or after it: the same values
    assert load_counters(data).counters == {"1": 3, "2": 1}


@pytest.mark.parametrize("piece", [1, 2, 10_000])
def test_the_data_file_is_written_as_json_dumps_would_indent_it(monkeypatch, piece):
    monkeypatch.setattr(livecounter, "SNAPSHOT_PIECE", piece)  # pieces of one, two, and all at once

    def text(ids, values):
        return b"".join(livecounter.snapshot_pieces(ids, values)).decode()
    values = {"1": 0, "blog.post-1": -5, "z": 9007199254740991}
    assert text(["gone", *values, "gone too"], values) == json.dumps(values, indent=2) + "\n"
    assert text(["1", "gone", "gone too", "z"], values) == json.dumps({"1": 0, "z": 9007199254740991}, indent=2) + "\n"
    assert text(["gone"], values) == text([], {}) == "{}\n"


@pytest.mark.parametrize("meanwhile", ["deleted and made", "made", "deleted"])
def test_a_data_file_written_while_counters_come_and_go_misses_none(tmp_path, monkeypatch, meanwhile):
    """A compaction reads the counters in pieces, without a copy, while the event loop goes on. A
    counter deleted and another made between two pieces move the others in the dict's order (read
    on, counter 3 would be missing from the file, and lost with the old journal): the file is then
    written again from a copy, and has every counter."""
    monkeypatch.setattr(livecounter, "SNAPSHOT_PIECE", 2)
    data = tmp_path / "counters.json"
    data.write_text(json.dumps({str(n): n for n in range(1, 6)}))
    loaded = load_counters(data)
    feed = livecounter.ChangeFeed()
    store = livecounter.CounterStore(loaded.counters, feed, auto_create=False, max_counters=100, durable=False)
    journal = livecounter.Journal(data, loaded, store, feed, save_interval=1, durable=False)
    expected = dict(loaded.counters)

    def the_loops_turn(seconds):  # the thread lets go of the GIL after a piece: the loop changes them
        if "deleted" in meanwhile and "2" in expected:
            store.delete("2")
            del expected["2"]
        if "made" in meanwhile and "x" not in expected:
            expected["x"] = store.set("x", 7)
    monkeypatch.setattr(livecounter.time, "sleep", the_loops_turn)
    journal._write_snapshot()
    assert json.loads(data.read_text()) == expected


def test_a_missing_data_file_with_a_journal_starts_from_the_journal(tmp_path):
    (tmp_path / "counters.json.journal").write_bytes(b'{"1": 2}\n')
    assert load_counters(tmp_path / "counters.json").counters == {"1": 2}


def test_replay_of_no_journal_is_nothing(tmp_path):
    counters = {"1": 1}
    assert replay(tmp_path / "none.journal", counters, cut_torn=True) == 0 and counters == {"1": 1}


# --- Pushpin's stats and publish pacing -----------------------------------------------------------

def tnet(value) -> bytes:
    """A tnetstring of value, as Pushpin writes them."""
    if isinstance(value, dict):
        payload, kind = b"".join(tnet(key) + tnet(item) for key, item in value.items()), b"}"
    elif isinstance(value, list):
        payload, kind = b"".join(map(tnet, value)), b"]"
    elif value is None:
        payload, kind = b"", b"~"
    elif isinstance(value, bool):
        payload, kind = str(value).lower().encode(), b"!"
    elif isinstance(value, (int, float)):
        payload, kind = str(value).encode(), b"#" if isinstance(value, int) else b"^"
    else:
        payload, kind = value.encode(), b","
    return b"%d:%s%s" % (len(payload), payload, kind)


def test_tnetstrings_of_every_type():
    report = tnet({"channel": "counter-2", "from": "pushpin-1234", "subscribers": 3, "ttl": 60,
                   "mode": "stream", "ratio": 0.5, "on": True, "x": None})
    assert tnetstring(report) == ({"channel": "counter-2", "from": "pushpin-1234", "subscribers": 3, "ttl": 60,
                                   "mode": "stream", "ratio": 0.5, "on": True, "x": None}, b"")
    assert tnetstring(b"4:1:a,]rest") == (["a"], b"rest")
    for broken in (b"10:abc,", b"x:abc,", b"3:abc?"):
        with pytest.raises(ValueError):
            tnetstring(broken)


def test_publish_pacing_spends_its_rate_in_whole_changes(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(livecounter.time, "monotonic", lambda: now[0])
    pacing = PublishPacing(rate=100)  # items a second; a second's worth in the bucket
    assert pacing.delay(200) == 0 and pacing.take(200) == 100  # 50 changes of 2 items
    assert pacing.delay(20) == pytest.approx(0.1)  # a round of 10 items waits for them
    now[0] += 0.1
    assert pacing.delay(20) == 0 and pacing.take(20) == 10
    assert PublishPacing(rate=1).take(10) == 2  # at least one whole change


# --- badges ------------------------------------------------------------------------------------------------

def test_badge_widths_fit_the_text_in_any_script():
    width = livecounter.text_width
    assert width("views") == pytest.approx(6.5 + 3.0 + 6.6 + 9.0 + 5.7)
    assert width("café") == pytest.approx(width("cafe"))  # an accent is its letter's width
    assert width("e\u0301") == pytest.approx(width("e"))  # a combining mark adds nothing
    assert width("訪問") == pytest.approx(2 * livecounter.FULL_WIDTH)  # wide characters are an em
    assert width("просмотры") < 9 * 8.5  # not stretched as the widest character
    assert width("👀") == livecounter.FULL_WIDTH


# --- settings ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, problem", [
    ({"grip_urls": "http://127.0.0.1:5561/"}, "grip_urls: takes a list"),
    ({"grip_urls": ("127.0.0.1:5561",)}, "grip_urls: must be an http:// or https:// URL"),
    ({"purge_urls": ("http://:6081/",)}, "purge_urls: must be an http:// or https:// URL"),
    ({"purge_urls": ("http://127.0.0.1:99999/",)}, "purge_urls: must be an http:// or https:// URL"),
    ({"save_interval": -1}, "save_interval: must be a number from 0.001 to"),
    ({"save_interval": math.inf}, "save_interval: must be a number from 0.001 to"),
    ({"max_listeners_per_ip": 0}, "max_listeners_per_ip: must be a whole number from 1 to"),
    ({"max_counters": 2.5}, "max_counters: must be a whole number"),
    ({"max_counters": True}, "max_counters: must be a whole number"),
    ({"auto_create": "enabled"}, "auto_create: must be one of 1, true, yes, on"),
    ({"reconnect_window": "1-x"}, "reconnect_window: must be MIN-MAX"),
    ({"cors_origin": "https://a.example, https://b.example"}, "cors_origin: must be one origin"),
    ({"cors_origin": "https://a.example/path"}, "cors_origin: must be one origin"),
    ({"grip_key": ""}, "grip_key: is empty"),
    ({"grip_stats": ("localhost:5560",)}, "grip_stats: must be ipc://PATH or tcp://HOST:PORT"),
    # Numbers so large or small that a wait or a rate made of them is infinite (found by an attack):
    ({"reconnect_window": "1e308-1e308"}, "reconnect_window: the shortest wait must be"),
    ({"post_rate": "1e-320"}, "post_rate: must be a number from 0.001"),
    ({"grip_message_rate": "1" + "0" * 400}, "grip_message_rate: must be a whole number from 1 to"),
    ({"grip_link_timeout": 10**310}, "grip_link_timeout: must be a whole number from 1 to"),
])
def test_a_setting_that_is_not_one_is_refused_naming_it(options, problem):
    with pytest.raises(ValueError, match=problem):
        Settings(**options)


def test_settings_take_text_as_the_command_line_writes_it():
    settings = Settings(save_interval="0.5", durable="yes", max_counters="12", reconnect_window="2-3",
                        cors_origin="https://site.example/", grip_urls=["http://127.0.0.1:5561/"])
    assert settings.save_interval == 0.5 and settings.durable is True and settings.max_counters == 12
    assert settings.reconnect_window == livecounter.ReconnectWindow(2, 3)
    assert settings.cors_origin == "https://site.example"  # the slash browsers never send is dropped
    assert settings.grip_urls == ("http://127.0.0.1:5561/",)
