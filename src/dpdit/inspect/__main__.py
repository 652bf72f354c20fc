from dpdit.inspect import main

main()
