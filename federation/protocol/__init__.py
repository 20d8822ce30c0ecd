"""What crosses between parties: the adapter wire format, Flower records, configs and round settings."""
