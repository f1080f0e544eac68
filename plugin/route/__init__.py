"""Routing: which pipeline runs on which series, and why.

* `plugin.route.rules`: the rules, `plan_study`, the dry run behind `radgate rules check`.
* `plugin.route.selection`: a pipeline's series requirements and preference order.
* `plugin.route.pipelines`: the installed pipelines' series declarations.
"""
