from nvswitch_dp.cli import main

raise SystemExit(main())
