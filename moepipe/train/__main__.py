from moepipe.train.cli import main

main()
