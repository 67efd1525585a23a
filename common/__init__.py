"""Small pieces both processes use: structured logging, the config file loader, the admin token."""
