from scsnn.cli import main

main()
