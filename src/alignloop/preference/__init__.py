"""From many labellers' rankings to a clean training set (no torch anywhere in here).

- :mod:`~alignloop.preference.pairs`: one ranking -> N-choose-2 pairs, preferred first.
- :mod:`~alignloop.preference.consensus`: ranked pairs (Tideman), Bradley-Terry, majority.
- :mod:`~alignloop.preference.agreement`: Krippendorff's alpha, leave-one-out tau-b, flagging.
- :mod:`~alignloop.preference.report`: :func:`feedback_report` (JSON) and its HTML page.
- :mod:`~alignloop.preference.export`: TRL ``prompt/chosen/rejected`` and grouped sets.
- :mod:`~alignloop.preference.imports`: HH-RLHF transcripts and plain pair files.
"""
