from galleryfs.cli import main

raise SystemExit(main())
