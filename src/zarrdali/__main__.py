from zarrdali.cli import main

raise SystemExit(main())
