// AudioWorklet processor for the talk page: the microphone's first channel,
// low-passed and resampled from the context's rate (often 48 kHz) to 16 kHz,
// posted to the page as 16-bit little-endian PCM frames of 100 ms, each with
// the frame's RMS level (0..1) for the meter.
//
// Resampling: a windowed-sinc FIR (Blackman, cutoff 0.45 x the output rate)
// keeps what is above 8 kHz from folding back, then linear interpolation at
// the output positions, which is exact enough once the signal is band-limited.
"use strict";

function lowpass(cutoff, length) {
  // cutoff in cycles per input sample (0..0.5); length odd
  const taps = new Float32Array(length), mid = (length - 1) / 2;
  let sum = 0;
  for (let i = 0; i < length; i++) {
    const x = i - mid;
    const sinc = x === 0 ? 2 * cutoff : Math.sin(2 * Math.PI * cutoff * x) / (Math.PI * x);
    const w = 0.42 - 0.5 * Math.cos((2 * Math.PI * i) / (length - 1)) + 0.08 * Math.cos((4 * Math.PI * i) / (length - 1));
    taps[i] = sinc * w;
    sum += taps[i];
  }
  for (let i = 0; i < length; i++) taps[i] /= sum;
  return taps;
}

class PcmDownsampler extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.outRate = opts.targetRate || 16000;
    this.frameSamples = opts.frameSamples || 1600;
    this.step = sampleRate / this.outRate; // input samples per output sample
    const length = this.step > 1 ? 2 * Math.ceil(8 * this.step) + 1 : 1;
    this.taps = this.step > 1 ? lowpass((0.45 * this.outRate) / sampleRate, length) : new Float32Array([1]);
    this.history = new Float32Array(this.taps.length * 2); // doubled ring: a contiguous window
    this.head = 0;
    this.n = 0; // index of the next filtered input sample
    this.t = 0; // input position of the next output sample
    this.prev = 0; // the filtered sample at index n - 1
    this.frame = new Int16Array(this.frameSamples);
    this.fill = 0;
    this.energy = 0;
    this.running = true;
    this.port.onmessage = (ev) => { if (ev.data === "stop") this.running = false; };
  }

  emit(value) {
    const v = value < -1 ? -1 : value > 1 ? 1 : value;
    this.frame[this.fill++] = v < 0 ? v * 0x8000 : v * 0x7fff;
    this.energy += v * v;
    if (this.fill === this.frameSamples) {
      const pcm = this.frame.buffer;
      this.port.postMessage({ pcm, level: Math.sqrt(this.energy / this.fill) }, [pcm]);
      this.frame = new Int16Array(this.frameSamples);
      this.fill = 0;
      this.energy = 0;
    }
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!this.running) return false;
    if (!channel) return true;
    const taps = this.taps, len = taps.length, hist = this.history;
    for (let i = 0; i < channel.length; i++) {
      // push into the doubled ring so hist[head .. head+len) is the last len samples
      hist[this.head] = hist[this.head + len] = channel[i];
      this.head = (this.head + 1) % len;
      let y = 0;
      for (let k = 0; k < len; k++) y += taps[k] * hist[this.head + k];
      while (this.t <= this.n) {
        const frac = this.t - (this.n - 1);
        this.emit(this.prev + frac * (y - this.prev));
        this.t += this.step;
      }
      this.prev = y;
      this.n++;
    }
    if (this.n > 1e9) { this.n -= 1e9; this.t -= 1e9; } // keep the counters exact
    return true;
  }
}

registerProcessor("pcm-downsampler", PcmDownsampler);
