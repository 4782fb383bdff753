#include "CVDPAShims.h"
