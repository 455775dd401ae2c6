"""Forge's Lora extension, extra_networks_lora.py (commit dfdcbab): `<lora:name:te[:unet]>` tags to
`networks.load_networks` (the text strength is the UNet's unless given); called for every batch, with no tags too.
Registered by scripts/lora_script.py (`before_ui`). Left out: Settings → "Add network to prompt", Lora hashes."""
import networks
from modules import extra_networks


class ExtraNetworkLora(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__('lora')
        self.errors = {}

    def activate(self, p, params_list):
        self.errors.clear()
        names, te_multipliers, unet_multipliers = [], [], []
        for params in params_list:
            assert params.items
            names.append(params.positional[0])
            te_multiplier = float(params.positional[1]) if len(params.positional) > 1 else 1.0
            te_multiplier = float(params.named.get("te", te_multiplier))
            unet_multiplier = float(params.positional[2]) if len(params.positional) > 2 else te_multiplier
            unet_multiplier = float(params.named.get("unet", unet_multiplier))
            te_multipliers.append(te_multiplier)
            unet_multipliers.append(unet_multiplier)
        networks.load_networks(names, te_multipliers, unet_multipliers)

    def deactivate(self, p):
        if self.errors:
            p.comment("Networks with errors: " + ", ".join(f"{k} ({v})" for k, v in self.errors.items()))
            self.errors.clear()
