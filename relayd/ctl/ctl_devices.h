/*
 * ctl_devices - "relayctl devices": every client relayd has seen, from the spool's device
 * history (spool.h "Devices"), to answer "why did the fax stop sending?".
 */
#ifndef RELAYD_CTL_DEVICES_H
#define RELAYD_CTL_DEVICES_H

#include "spool/spool.h"

/* relayctl devices [--json] [ADDR]: argv holds the arguments after "devices".  Prints to
 * stdout; exit status 0, 1 (spool error, or ADDR never seen), 2 (usage). */
int ctl_devices(struct spool *sp, int argc, char **argv);

#endif
