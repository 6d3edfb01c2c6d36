"""``python -m modal_jobs.demo_data``: write a demo data set (see ``writer.main``)."""

from modal_jobs.demo_data.writer import main

raise SystemExit(main())
