"""The report page's template: it ships inside the package, escapes what users named, and inlines its CSS."""

import importlib.resources

from compare_fakes import build_fake_experiment

from deltatune.compare import store
from deltatune.compare.report import TEMPLATES, render_html
from deltatune.compare.summary import analyze


def test_the_template_and_its_style_sheet_are_package_data():
    folder = importlib.resources.files("deltatune.compare") / TEMPLATES
    assert "{{ title }}" in (folder / "report.html.j2").read_text(encoding="utf-8")
    assert ".verdict.good" in (folder / "report.css").read_text(encoding="utf-8")


def test_names_from_the_spec_are_escaped_and_the_css_is_inline(tmp_path):
    experiment = build_fake_experiment(tmp_path / "experiment")
    connection = store.connect(experiment)
    with connection:
        connection.execute("UPDATE cells SET variant = '<script>alert(1)</script>' WHERE variant = 'bitfit'")
        connection.execute("UPDATE cells SET error = 'a <b>bold</b> & \"quoted\" failure' WHERE status = 'failed'")
    connection.close()
    html = render_html(analyze(experiment))
    assert "<script" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<b>bold</b>" not in html and "a &lt;b&gt;bold&lt;/b&gt; &amp; &#34;quoted&#34; failure" in html
    css = (importlib.resources.files("deltatune.compare") / TEMPLATES / "report.css").read_text(encoding="utf-8")
    assert f"<style>\n{css}</style>" in html
    # the charts and the claims' bold text are markup built in Python: they arrive unescaped
    assert '<svg class="plot" data-plot="fraction:alpha"' in html and "<strong>" in html
