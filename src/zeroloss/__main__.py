from zeroloss.cli import main

main()
