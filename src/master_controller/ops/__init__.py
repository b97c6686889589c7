"""Operating master-controller on a host: the systemd unit and its config (``install``),
releases deployed from version control with a health gate and automatic rollback
(``deploy``)."""
