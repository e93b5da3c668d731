"""engine.stop: stop strings held back across streamed deltas, never emitted."""

from engine.stop import StopChecker


def test_stop_split_across_deltas_not_emitted():
    sc = StopChecker(["</end>"])
    emitted = []
    for d in ["Hello wor", "ld</e", "n", "d> trailing"]:
        text, stopped = sc.feed(d)
        emitted.append(text)
        if stopped:
            break
    assert "".join(emitted) == "Hello world"
    assert stopped and sc.matched == "</end>"
    assert sc.flush() == ""
    assert sc.feed("more") == ("", True)


def test_partial_prefix_released_when_not_a_stop():
    sc = StopChecker(["STOP"])
    assert sc.feed("abc ST") == ("abc ", False)
    assert sc.feed("O") == ("", False)
    assert sc.feed("RM here") == ("STORM here", False)
    assert sc.feed(" ST") == (" ", False)
    assert sc.flush() == "ST"  # generation ended: held text is released


def test_stop_in_single_delta_and_earliest_of_several():
    sc = StopChecker(["xyz", "b"])
    assert sc.feed("aaxyzb") == ("aa", True)
    sc = StopChecker(["\n\n", "User:"])
    assert sc.feed("answer\n") == ("answer", False)
    assert sc.feed("User: hi") == ("\n", True)
    assert StopChecker([]).feed("anything") == ("anything", False)
