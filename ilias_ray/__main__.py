from ilias_ray.cli import main

raise SystemExit(main())
