// lohatrain: what Gradio cannot do — the live training panel (progress, loss chart, preview), and "Send to
// txt2img". The status comes through the tab's own hidden Gradio event (#lohatrain_poll writes the JSON of
// GET /lohatrain/v1/status, with what the tab adds, into #lohatrain_status_json), so it passes --gradio-auth like
// the rest of the tab. The same event brings the loaded model's line up to date: the panel polls when the page
// loads, when the tab is shown, when the project name changes, and every second while a run is followed.
(function () {
    let timer = null;
    let last = null;             // the last status received
    let lastText = "";           // its JSON: each answer differs (it carries a counter), so a new one is seen
    let wanted = 0;              // answers still wanted since something changed (the tab shown, the name typed)
    let preview = null;          // the latest preview image (a data URL), sent once per preview step
    let answerBefore = null;     // the token of Train's last answer before this press; null: not waiting
    let answerTicks = 0;
    let awaited = null;          // the job Train started, until the status shows it
    let awaitedTicks = 0;
    let dismissed = null;        // a finished job shown before Train was pressed: not shown again
    const UNKNOWN = {};          // dismissed: the finished job the next status shows (none was known at the press)

    function app() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    function fmtTime(seconds) {
        if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
        const s = Math.round(seconds);
        const m = Math.floor(s / 60);
        return m > 0 ? `${m}:${String(s % 60).padStart(2, "0")}` : `${s}s`;
    }

    function escapeHtml(text) {
        const div = document.createElement("div");
        div.textContent = text === null || text === undefined ? "" : String(text);
        return div.innerHTML;
    }

    // The step axis' labels: its first and last step, and round steps between them (multiples of 1, 2 or 5 times a
    // power of ten, about four in all) not too close to either end.
    function stepTicks(first, lastStep) {
        const span = Math.max(1, lastStep - first);
        const power = Math.max(1, Math.pow(10, Math.floor(Math.log10(span / 4))));  // whole steps
        const unit = [1, 2, 5, 10].map(m => m * power).find(u => span / u <= 5) || 10 * power;
        const ticks = [first];
        for (let t = Math.ceil(first / unit) * unit; t <= lastStep - unit / 2; t += unit) {
            if (t >= first + unit / 2) ticks.push(Math.round(t));
        }
        return [...new Set(lastStep > first ? [...ticks, lastStep] : ticks)];
    }

    // The loss at each step (faint) and its smoothed curve, over a step axis; the loss axis is labelled by its
    // highest and lowest values.
    function lossChart(s) {
        const losses = s.losses || [], smooth = s.smooth_losses || [], steps = s.loss_steps || [];
        if (losses.length < 2 || steps.length !== losses.length) return "";
        const w = 320, h = 90;
        const values = losses.concat(smooth.filter(v => v !== null));
        const lo = Math.min(...values), hi = Math.max(...values);
        const span = hi - lo || 1;
        const first = steps[0], lastStep = steps[steps.length - 1];
        const x = step => (lastStep > first ? (step - first) / (lastStep - first) : 0);
        const line = series => series.map((v, i) => v === null ? null :
            `${(x(steps[i]) * w).toFixed(1)},${(h - (v - lo) / span * h).toFixed(1)}`).filter(Boolean).join(" ");
        const ticks = stepTicks(first, lastStep).map(t =>
            `<span style="left:${(x(t) * 100).toFixed(1)}%">${t}</span>`).join("");
        return `<div class="lohatrain-chart-wrap">
                  <div class="lohatrain-chart-plot">
                    <svg class="lohatrain-chart" viewBox="0 0 ${w} ${h}" preserveAspectRatio="none" role="img"
                         aria-label="loss chart"><polyline class="lohatrain-loss" points="${line(losses)}"/>
                      <polyline class="lohatrain-smooth" points="${line(smooth)}"/></svg>
                    <div class="lohatrain-chart-steps">${ticks}</div>
                  </div>
                  <div class="lohatrain-chart-scale"><span>${hi.toFixed(4)}</span><span>${lo.toFixed(4)}</span></div>
                </div>
                <div class="lohatrain-chart-legend"><span class="lohatrain-key-loss">loss</span>
                  <span class="lohatrain-key-smooth">smoothed loss</span><span>across: step</span></div>`;
    }

    // The Lora cards of txt2img and img2img read the folder again (the WebUI's own hidden refresh buttons,
    // extraNetworks.js), so the new file is there without pressing Refresh.
    function refreshLoraCards() {
        for (const tab of ["txt2img", "img2img"]) {
            const button = app().querySelector(`#${tab}_lora_extra_refresh_internal`);
            if (button) button.dispatchEvent(new Event("click"));
        }
    }

    function shows(s) {
        return s.state !== "idle" && s.job_id !== dismissed;
    }

    // The file Send to txt2img names: the shown run's once it is written, else the project name's when the Lora
    // folder has it; none while the shown run trains.
    function sendName(s) {
        if (shows(s) && s.state === "running") return null;
        if (shows(s) && s.file_name && s.file_exists) return s.name;
        return s.project_file || null;
    }

    function render(s) {
        const panel = app().querySelector("#lohatrain_live");
        if (!panel) return;
        if (!shows(s)) {
            panel.innerHTML = "";
            return;
        }
        const pct = s.total ? Math.min(100, 100 * s.step / s.total) : 0;
        const stage = s.state === "running" && s.stage !== "Training" ? escapeHtml(s.stage) : "";
        const numbers = s.step > 0
            ? `step ${s.step}/${s.total} · loss ${s.smooth_loss === null ? "–" : s.smooth_loss.toFixed(4)}` +
              ` · ${s.it_per_s ? s.it_per_s.toFixed(2) : "–"} it/s · ETA ${fmtTime(s.eta_s)}` +
              (stage ? ` · ${stage}` : "")
            : stage;
        const figure = s.preview_url && preview
            ? `<figure><img class="lohatrain-preview" src="${preview}" alt="preview">` +
              `<figcaption>Preview at step ${s.preview_step}` +
              (s.preview_prompt ? `: “${escapeHtml(s.preview_prompt)}”` : "") + `</figcaption></figure>` : "";
        const done = s.state !== "running"
            ? `<div class="lohatrain-message lohatrain-${s.state === "error" ? "error" : "info"}" id="lohatrain_result">` +
              `${escapeHtml(s.message)}${s.file_name ? `<br>File: <code>${escapeHtml(s.file_name)}</code>` : ""}</div>`
            : "";
        panel.innerHTML =
            `<div class="lohatrain-state" data-state="${escapeHtml(s.state)}">${escapeHtml(s.state)}</div>` +
            `<div class="lohatrain-progress"><div class="lohatrain-bar" style="width:${pct}%">` +
            `${Math.round(pct)}%</div></div>` +
            `<div class="lohatrain-numbers">${numbers}</div>` + lossChart(s) + figure + done +
            (s.warnings && s.warnings.length ? `<ul class="lohatrain-warnings">${s.warnings.map(
                w => `<li>${escapeHtml(w)}</li>`).join("")}</ul>` : "");
    }

    function message() {
        return app().querySelector("#lohatrain_message");
    }

    function answerToken() {
        const box = message();
        const answer = box && box.querySelector("[data-lohatrain-answer]");
        return answer ? answer.dataset.lohatrainAnswer : "";
    }

    // After Train: wait for its answer (a new token in the message; Gradio's pending marks change the message
    // too, so only the token counts). It carries the new job's id, or says why none started. A very slow answer
    // stops the wait (after 10 minutes), and the panel then shows whatever job there is.
    function trainAnswered() {
        if (answerBefore === null) return true;
        if (answerToken() === answerBefore && ++answerTicks < 600) return false;
        const started = answerToken() !== answerBefore && message().querySelector("[data-lohatrain-job]");
        answerBefore = null;
        awaited = started ? started.dataset.lohatrainJob : null;
        awaitedTicks = 0;
        if (!started) render({state: "idle"});  // refused: the message says why
        wanted = 2;  // the status as it is now
        return true;
    }

    function handle(s) {
        if (s.preview_data) preview = s.preview_data;
        if (dismissed === UNKNOWN && awaited !== null && s.job_id === awaited) dismissed = null;  // none was shown
        if (dismissed === UNKNOWN && s.state !== "running") dismissed = s.job_id || null;
        const send = app().querySelector("#lohatrain_send");
        if (send) send.disabled = answerBefore !== null || !sendName(s);
        if (answerBefore !== null) return;  // Train's answer first: the panel says "Starting" meanwhile
        // the new job is not in the status yet (it was asked for before the job started)
        if (awaited !== null && s.job_id !== awaited && ++awaitedTicks < 10) return;
        awaited = null;
        if (s.file_name && s.state !== "running" && last && last.state === "running") refreshLoraCards();
        last = s;
        render(s);
    }

    // Whether to keep polling after this answer: while Train's answer or its job is awaited, or a shown run trains.
    function following() {
        return answerBefore !== null || awaited !== null || (last !== null && shows(last) && last.state === "running");
    }

    // Every second: a new answer is handled; then the poll is sent again while answers are wanted or a run is
    // followed. Gradio drops a press of the hidden button while its last one is being answered, so a press that
    // was lost (one made before the page was ready) is made again on the next tick, and no more are sent.
    function poll() {
        const box = app().querySelector("#lohatrain_status_json textarea");
        const button = app().querySelector("#lohatrain_poll");
        if (!box || !button) return;
        const answered = trainAnswered();
        if (box.value && box.value !== lastText) {
            lastText = box.value;
            wanted = Math.max(0, wanted - 1);
            handle(JSON.parse(box.value));
        }
        if (!answered || wanted > 0 || following()) {
            button.click();
        } else {
            stop();
        }
    }

    // Two answers: the first may have been asked for before the change.
    function start() {
        wanted = 2;
        if (timer === null) timer = setInterval(poll, 1000);
        poll();
    }

    function stop() {
        if (timer !== null) clearInterval(timer);
        timer = null;
    }

    window.lohatrainSendToTxt2img = function () {
        const name = last && sendName(last);
        const prompt = app().querySelector("#txt2img_prompt textarea");
        if (prompt && name) {
            // with the trigger words the run's file holds (its card's activation text)
            const tag = [`<lora:${name}:1>`, name === last.name && last.file_exists ? last.activation_text : ""];
            prompt.value = tag.filter(Boolean).join(", ") + (prompt.value ? ", " + prompt.value : "");
            prompt.dispatchEvent(new Event("input", {bubbles: true}));
        }
        if (typeof switch_to_txt2img === "function") {
            switch_to_txt2img();
        } else {
            const tabButton = [...app().querySelectorAll("#tabs > .tab-nav > button, .tab-nav button")]
                .find(b => b.textContent.trim() === "txt2img");
            if (tabButton) tabButton.click();
        }
        return [];
    };

    function hook() {
        const buttons = ["#lohatrain_train", "#lohatrain_resume"].map(id => app().querySelector(id));
        const tab = app().querySelector("#lohatrain_tab");
        const name = app().querySelector("#lohatrain_name textarea, #lohatrain_name input");
        const send = app().querySelector("#lohatrain_send");
        if (buttons.some(b => !b) || !tab || !name || !send || buttons[0].dataset.lohatrainHooked) return false;
        send.disabled = true;  // until the first status says which file it would name
        for (const button of buttons) {  // Train and Resume both answer in the message with a job to follow
            button.dataset.lohatrainHooked = "1";
            button.addEventListener("click", () => {
                answerBefore = answerToken();
                answerTicks = 0;
                awaited = null;
                dismissed = last === null ? UNKNOWN : last.state !== "running" ? last.job_id || null : dismissed;
                render({state: "running", stage: "Starting", step: 0, total: 0, losses: []});
                start();
            });
        }
        let typing = null;  // Send follows the project name's file, once the typing pauses
        name.addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(start, 300); });
        // shown again (back from txt2img, where a generation may have loaded another model): the model line
        new IntersectionObserver(entries => { if (entries.some(e => e.isIntersecting)) start(); }).observe(tab);
        start();  // the last run's result, or a run started through the REST API or before a reload
        return true;
    }

    const observer = new MutationObserver(() => { if (hook()) observer.disconnect(); });
    document.addEventListener("DOMContentLoaded", () => {
        if (!hook()) observer.observe(document.documentElement, {childList: true, subtree: true});
    });
    window.lohatrainPoll = start;
})();
