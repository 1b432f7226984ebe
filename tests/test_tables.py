"""The one Markdown table writer: alignment row, escaping, and refusing ragged rows."""

import pytest

from caopd.evaluation.tables import markdown_table


def test_names_left_numbers_right_and_a_pipe_in_a_cell_is_escaped():
    text = markdown_table(["arm", "ece"], [["a|b", "0.100"], ["c", "0.200"]])
    assert text == "| arm | ece |\n|---|---:|\n| a\\|b | 0.100 |\n| c | 0.200 |\n"


def test_an_empty_cell_is_one_space():
    assert markdown_table(["case", "ratio"], [["x", ""]]).splitlines()[-1] == "| x | |"


def test_alignment_can_be_given_per_column():
    assert markdown_table(["x", "y", "z"], [], align="lrl").splitlines()[1] == "|---|---:|---|"


def test_a_row_with_the_wrong_number_of_cells_is_refused():
    with pytest.raises(ValueError, match="3 cells"):
        markdown_table(["x", "y", "z"], [["1", "2"]])
