from dynheads.cli import main

main()
