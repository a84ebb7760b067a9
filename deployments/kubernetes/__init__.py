"""Code that only the Helm chart runs or reads: the chart's values models, from which ``helm/values.schema.json`` is
generated (:mod:`.chart_values`, :mod:`.security_values`), and the worker pods' ``preStop`` hook
(:mod:`.node_drain`). Nothing that serves a request imports it; ``make serve`` never runs it."""
