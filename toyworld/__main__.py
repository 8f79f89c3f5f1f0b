from toyworld.experiment import main

if __name__ == "__main__":  # not in the processes `--jobs` starts, which import this module again
    main()
