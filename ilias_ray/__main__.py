from ilias_ray.cli.main import main

raise SystemExit(main())
