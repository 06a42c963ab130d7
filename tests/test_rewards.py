from rewards.arithmetic import score_arithmetic, strip_thinking


def test_correct_answer_after_thinking():
    r = score_arithmetic("<think>3+5</think><answer>8</answer>", 8)
    assert (r.reward, r.reason) == (1.0, "correct")


def test_wrong_answer_names_both_numbers():
    r = score_arithmetic("<think>3+5</think><answer>9</answer>", 8)
    assert r.reward == 0.0 and "9" in r.reason and "8" in r.reason


def test_answer_only_inside_thinking_earns_nothing():
    assert score_arithmetic("<think><answer>8</answer></think>", 8).reward == 0.0


def test_several_answers_are_rejected():
    r = score_arithmetic("<answer>7</answer><answer>8</answer>", 8)
    assert r.reward == 0.0 and "2 answers" in r.reason


def test_malformed_and_empty_outputs():
    for text in ["", "8", "<answer>eight</answer>", "<answer>8", "\x00\xff<answer>", "<answer>8</answer" * 1000]:
        assert score_arithmetic(text, 8).reward == 0.0


def test_unicode_digits_do_not_count():
    # Full-width and Arabic-Indic digits look like 8 but are not the ASCII answer the format asks for.
    assert score_arithmetic("<answer>\uff18</answer>", 8).reward == 0.0
    assert score_arithmetic("<answer>\u0668</answer>", 8).reward == 0.0


def test_negative_answers_parse():
    assert score_arithmetic("<answer>-3</answer>", -3).reward == 1.0


def test_giant_output_is_fast():
    text = "<think>" + "x" * 1_000_000 + "</think><answer>8</answer>"
    assert score_arithmetic(text, 8).reward == 1.0


def test_strip_thinking_uses_last_close_tag():
    assert strip_thinking("<think>a</think>b</think>c") == "c"
    assert strip_thinking("no tags") == "no tags"
