"""Stage 4: draw the patterns and the results.

``figures`` (matplotlib, for papers) · ``terminal`` (text) · ``notebook`` (CircuitsVis views) ·
``report`` (a self-contained offline HTML report; its page, script and style are the package data
files in ``assets/``).
"""
