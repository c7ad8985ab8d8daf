from tlslab.cli import main

raise SystemExit(main())
