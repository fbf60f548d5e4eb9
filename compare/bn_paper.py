from compare.studies.bn_paper import main

if __name__ == "__main__":
    raise SystemExit(main())
