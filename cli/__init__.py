"""The `tritnet` command line (click). Commands only parse options and call into tritnet."""
