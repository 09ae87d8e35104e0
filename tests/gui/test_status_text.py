"""The status-bar sentence after a check round says what was recorded but not sent back."""
from annotator.gui.status_area import describe_result


def test_a_check_summary_names_the_flags_not_sent_back():
    plain = describe_result("check", {"round": 3, "flagged": 2, "accepted": 60})
    assert plain.startswith("Check round 3: 2 images flagged, 60 accepted") and "not sent back" not in plain
    both = describe_result("check", {"round": 4, "flagged": 1, "accepted": 61, "overruled": 2, "accepted_before": 3})
    assert both.startswith("Check round 4: 1 image flagged")
    assert both.endswith("not sent back: 2 on labels you kept against a flag, 3 on labels an earlier round "
                         "accepted, unchanged since.")
    done = describe_result("check", {"round": 5, "flagged": 0, "accepted": 62, "accepted_before": 1,
                                     "loop_finished": True})
    assert done.startswith("The check raised no flag: the loop is finished.") and done.endswith("not sent back: 1 on labels an earlier round accepted, unchanged since.")


def test_status_bar_names_images_that_could_not_be_read():
    lost = ["test/hole/003.png: file not found (/data/test/hole/003.png)"]
    pre = describe_result("prelabel", {"prelabelled": 9, "defective": 4, "unreadable": lost})
    assert pre.endswith("1 image could not be read and was left out: " + lost[0] + " (moved? Project → Find moved images…)")
    chk = describe_result("check", {"round": 2, "flagged": 1, "accepted": 8, "unreadable": lost * 2})
    assert "2 images could not be read and were left out" in chk
    exp = describe_result("export", {"images": 5, "defective": 2, "regions": 3, "out": "/o", "skipped": 1,
                                     "unreadable": lost, "loop_finished": True})
    assert "left out" in exp and "(the loop was not finished)" not in exp
    assert "could not be read" not in describe_result("prelabel", {"prelabelled": 9, "defective": 4})
