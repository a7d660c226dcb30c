from selfalign.cli.main import main

main()
