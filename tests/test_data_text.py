"""Texts built from several columns: a template or a list of columns, in the library and the
experiment config."""

from __future__ import annotations

import pandas as pd
import pytest
from integral_superposition.data import (
    compose_text,
    load_dataset_auto,
    load_titles_csv,
    validate_frame,
)
from integral_superposition.experiment import ConfigError, load_config


@pytest.fixture
def news_csv(tmp_path):
    path = tmp_path / "news.csv"
    pd.DataFrame(
        {
            "title": ["Rates rise", "None", "Cup final"],
            "description": ["The bank moved.", "A quiet day.", None],
            "topic": ["business", "world", "sport"],
        }
    ).to_csv(path, index=False)
    return str(path)


def test_template_and_column_list(news_csv):
    df = load_titles_csv(news_csv, text="{title}. {description}")
    assert df["title"].tolist() == [
        "Rates rise. The bank moved.",
        "None. A quiet day.",
        "Cup final. ",
    ]
    assert df["topic"].tolist() == ["business", "world", "sport"]
    df = load_titles_csv(news_csv, "text", text=["title", "description"])
    assert df["text"].tolist() == ["Rates rise The bank moved.", "None A quiet day.", "Cup final"]
    assert df["title"].tolist() == ["Rates rise", "None", "Cup final"]  # sources kept as read
    # the seed's positional call is unchanged
    assert load_titles_csv(news_csv, "title", "topic")["title"].tolist()[1] == "None"
    auto = load_dataset_auto(news_csv, "text", text="{topic}: {title}")
    assert auto["text"].tolist()[0] == "business: Rates rise"


def test_missing_and_bad_columns(news_csv):
    with pytest.raises(
        ValueError,
        match=r"no column 'body'; available columns: \['title', 'description', 'topic'\]",
    ):
        load_titles_csv(news_csv, text="{title}. {body}")
    with pytest.raises(ValueError, match=r"text=\['title', 'summary'\]: no column 'summary'"):
        load_titles_csv(news_csv, text=["title", "summary"])
    with pytest.raises(ValueError, match="names no column"):
        compose_text(pd.DataFrame({"a": ["x"]}), "plain text", "t")
    with pytest.raises(ValueError, match=r"field \{0\} is not a column name"):
        compose_text(pd.DataFrame({"a": ["x"]}), "{0}", "t")
    with pytest.raises(ValueError, match="non-empty list"):
        compose_text(pd.DataFrame({"a": ["x"]}), [], "t")
    # a composed text that is empty is reported with its row, like any empty text
    with pytest.raises(ValueError, match="row 0: empty text"):
        validate_frame(compose_text(pd.DataFrame({"a": [None]}), ["a"], "t"), "t", None)


def test_experiment_config_text(news_csv, tmp_path):
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(
        f"preset: smoke\ndata:\n  source: {news_csv}\n  text_col: text\n"
        "  text: '{title}. {description}'\n  max_rows: 2\n"
    )
    cfg = load_config(cfg_path)
    assert cfg.data.text == "{title}. {description}" and cfg.data.text_col == "text"
    df = cfg.data.load()
    assert df["text"].tolist() == ["Rates rise. The bank moved.", "None. A quiet day."]
    listed = load_config(cfg_path, ["data.text=[title, description]"]).data.load()
    assert listed["text"].tolist()[0] == "Rates rise The bank moved."
    # text_col alone keeps working
    plain = load_config(cfg_path, ["data.text=null", "data.text_col=title"]).data.load()
    assert plain["title"].tolist() == ["Rates rise", "None"]
    with pytest.raises(ConfigError, match="names no column"):
        load_config(cfg_path, ["data.text=no fields"])
    missing = load_config(cfg_path, ["data.text='{headline}'"])
    with pytest.raises(ValueError, match="no column 'headline'; available columns"):
        missing.data.load()
