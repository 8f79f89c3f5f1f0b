from toyworld.experiment import main

main()
