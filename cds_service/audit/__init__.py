"""Population audit (billing-rules.md §8, contract.md ``population-audit``).

The hooks judge one patient when a clinician acts; the audit judges every store-and-forward assessment of a
population, from FHIR Bulk Data NDJSON, with the same function (``cds_service.rules.engine.evaluate_record``) —
no rule is implemented twice. The package is layered the way the hooks are:

- ``keys``      which resources the audit reads, whose patient each belongs to, which patients are candidates
                (shared by every engine, so DuckDB's SQL, Spark's expressions and Python agree);
- ``patient``   one patient's raw resources in, finding rows out (parse → ``evaluate_record`` → §8 class);
- ``findings``  the row schema (``COLUMNS``), the §8 classes, OIG screens, money and timely filing;
- ``sources``   NDJSON files (plain or gzip) and bad-line accounting; ``bulk`` FHIR Bulk Data ``$export``;
- ``local``     the embedded engine (DuckDB groups by patient out of core, a process pool evaluates);
- ``spark``     the same job as a Spark application;
- ``outputs``   findings.parquet / findings.csv / summary.json; ``report`` the self-contained report.html;
- ``run``       the command: source → engine → outputs, exit codes 0 / 2 / 3.
"""
