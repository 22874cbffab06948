from dermaops.cli import main

raise SystemExit(main())
